"""Stores: the contract (``base``), the reference ``memory`` store, ``filesystem``
and ``s3``; ``registry.open_store`` picks one by configuration."""
