"""In-place swaps of hierarchical attention into 3D ViTs people already train.

``hlip_fast.integrations.monai``: MONAI's ``ViT`` / ``UNETR`` and any tree of MONAI
``TransformerBlock`` s; ``hlip_fast.integrations.timm``: timm ``VisionTransformer``-based 3D
models. Each keeps every parameter and buffer under its original name. Import the one you need:
each imports its library (an optional extra) when imported.
"""
