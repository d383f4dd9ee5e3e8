"""The smallest MLServer runtime that serves an ONNX file, for bench/triton_clients.py.

MLServer (Seldon) ships runtimes for scikit-learn, XGBoost, LightGBM, MLflow, Hugging Face and others, but
none for ONNX, so this baseline is the custom runtime its documentation describes: an `MLModel` whose
`load` opens the file with ONNX Runtime and whose `predict` decodes every input with `NumpyCodec`, runs the
session and encodes every output back. One intra-op and one inter-op thread, like our node's executor, so
both servers compute on one core. It runs in the bench's own MLServer virtual environment, never in ours:

    mlserver start DIR      # settings.json and model-settings.json, written by bench/triton_clients.py

model-settings.json names it `"implementation": "mlserver_onnx.OnnxRuntimeModel"` with
`"parameters": {"uri": "/path/to/model.onnx"}`.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    """One ONNX Runtime session on the CPU; requests are answered one by one, as they come."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        uri = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        names = [output.name for output in payload.outputs or []]
        names = names or [output.name for output in self._session.get_outputs()]
        arrays = self._session.run(names, feed)
        outputs = [NumpyCodec.encode_output(name, array) for name, array in zip(names, arrays, strict=True)]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
