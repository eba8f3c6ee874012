"""Reading and writing Hugging Face checkpoint folders: the export (model + tokenizer -> folder) and
the loaders the CLIs use, which never run a folder's own code unless asked. Not part of the exported
model code."""
