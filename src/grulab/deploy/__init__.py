"""Shipping a trained model: :mod:`~grulab.deploy.export` (ONNX, with the GRU as ONNX's own
operator), :mod:`~grulab.deploy.onnx_generate` (generation through onnxruntime, without torch)
and :mod:`~grulab.deploy.onnx_cli` (``grulab export`` and ``grulab generate --onnx``).
"""
