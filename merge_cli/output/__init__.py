"""What a merge writes beside the weights, and the commands that read a finished output.

- sidefiles.py: config/tokenizer/chat-template files from the donor (SIDE_FILES: the one list).
- card.py: the README.md model card; report.py: merge_report.json / .md.
- verify.py: manifest, index and shape checks of a written folder; check.py: a transformers sanity check.
- push.py: publishing a folder to the Hugging Face Hub.
"""
