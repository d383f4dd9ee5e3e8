"""The seed's Flask app, kept as the seed wrote it (the baseline of `bench/predict.py`).

Changed only where it must be: TensorFlow is not installable here, so the interpreter comes from
`ai_edge_litert` (the same TFLite runtime); the model path comes from env `SEED_MODEL_PATH`; the server
listens on 127.0.0.1 and the port from env `SEED_PORT`. Everything else, the shared interpreter included,
is the seed's code.
"""

import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from flask import Flask, jsonify, request

app = Flask(__name__)
model_path = os.environ.get("SEED_MODEL_PATH", "model.tflite")
interpreter = Interpreter(model_path=model_path)
interpreter.allocate_tensors()
input_details = interpreter.get_input_details()
output_details = interpreter.get_output_details()


@app.route("/predict", methods=["POST"])
def predict():
    try:
        data = request.get_json(force=True)
        input_data = np.array(data["input_data"], dtype=np.float32)
        input_shape = input_details[0]["shape"]
        if input_data.shape != tuple(input_shape[1:]):
            return jsonify(
                {
                    "error": f"Input data shape is incorrect. Expected: {input_shape[1:]}, "
                    f"got: {input_data.shape}"
                }
            ), 400
        interpreter.set_tensor(input_details[0]["index"], np.expand_dims(input_data, axis=0))
        interpreter.invoke()
        output_data = interpreter.get_tensor(output_details[0]["index"])
        return jsonify({"prediction": output_data.tolist()})
    except Exception as e:
        return jsonify({"error": str(e)}), 500


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("SEED_PORT", "5000")), debug=False)
