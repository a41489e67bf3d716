"""msk plugin: chondromyxoid fibroma (CMF), a rare benign chondrogenic bone tumour, with the
entities it is told apart from on radiographs. The hooks are in :mod:`msk_chondromyxoid.plugin`."""

__version__ = "0.1.0"
