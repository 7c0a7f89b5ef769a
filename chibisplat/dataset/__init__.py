"""The packed dataset: Parquet schema, captions, packing, prompt embeddings and the training loader.

Submodules are imported on demand (``from chibisplat.dataset.pack import pack``) so that a DataLoader
worker does not pay for ``transformers`` and a packer does not pay for ``torch``.
"""
