"""The command lines' side of Hugging Face folders: loading a checkpoint folder and its tokenizer
without running the folder's code unless asked (loading.py), and streaming detokenisation of a
growing token sequence (streaming.py). Writing folders is export/."""
