"""Records of every kind, one module per kind (``cross_modal``, ``pretrain``, ``chain_of_modality``, ``dialogue``,
``interleaved``, ``duplex``), what they share (``common``, ``speech``, ``texts``) and the instruction templates.
"""
