"""The ONNX models behind ``--vad silero`` and ``--turn-detection smart``, and where they come from.

Both files ship inside the ``pipecat-ai`` wheel (BSD-2-Clause), so nothing is downloaded
at run time: ``silero_vad.onnx`` (Silero VAD, MIT) and ``smart-turn-v3.2-cpu.onnx``
(Pipecat's Smart Turn v3, BSD-2-Clause). We only read the files: pipecat is never
imported (its import pulls loguru and much more). They run on onnxruntime, one thread
per session: a gateway runs many streams, and one stream must not take every core.

Both are optional (``pip install 'talkgate[ears]'``); ``require`` says at start-up, not
at the first call, what is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: Where each model lies inside the pipecat package.
SILERO_VAD = "audio/vad/data/silero_vad.onnx"
SMART_TURN = "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
EXTRA = "pip install 'talkgate[ears]'"


class ModelUnavailable(RuntimeError):
    """A model file or onnxruntime is not installed."""


def model_path(relative: str) -> Path:
    """The file inside the installed pipecat-ai package, found without importing pipecat."""
    spec = importlib.util.find_spec("pipecat")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ModelUnavailable(f"{Path(relative).name} is not installed: {EXTRA} (the pipecat-ai wheel ships it)")


def require(relative: str) -> Path:
    """Fail now, with what to install, unless both onnxruntime and the model file are there."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ModelUnavailable(f"onnxruntime is not installed: {EXTRA}")
    return model_path(relative)


def session(relative: str) -> Any:
    """An onnxruntime session on one thread (the caller's), CPU only. Thread-safe to run."""
    path = require(relative)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
