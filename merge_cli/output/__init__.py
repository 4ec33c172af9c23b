"""What a merge writes beside the model: reports (JSON, Markdown, HTML), card, side files, checks."""
