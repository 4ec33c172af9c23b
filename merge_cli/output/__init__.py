"""What a merge writes beside the weights, and the commands that read a finished output.

- sidefiles.py: config/tokenizer/chat-template files from the donor (SIDE_FILES: the one list).
- card.py: the README.md model card; report.py: merge_report.json / .md.
- html_report.py: merge_report.html, the analysis page and the comparison page (self-contained HTML);
  plots.py draws their plots (matplotlib, optional); run_stats.py: per-layer figures from merge_report.json.
- verify.py: manifest, index and shape checks of a written folder; check.py: a transformers sanity check.
- push.py: publishing a folder to the Hugging Face Hub.
"""
