"""The S3 store (``store.S3Store``); its docstring maps the collaborators."""
