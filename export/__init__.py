"""Writing Hugging Face checkpoint folders: a model and its tokenizer as a folder that loads with
`AutoModelForCausalLM.from_pretrained` (folder.py), and a training checkpoint of any engine
exported as one (from_training.py, `python train.py export`)."""
