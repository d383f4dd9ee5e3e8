"""Small models made without a training framework: dense layers, our ONNX and TFLite writers, the
node's default classifier trained with numpy."""
