"""Export: a checkpoint as an ONNX model that ONNX Runtime and rembg's custom session load as is.

``config`` (``ExportConfig``, the job's options) and ``onnx_model`` (the export and its check
against PyTorch; needs torch, onnx and onnxruntime, the ``.[onnx]`` extra). Design: docs/export.md.
"""
