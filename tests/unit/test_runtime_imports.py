import subprocess
import sys


def test_the_node_and_gateway_runtimes_import_no_training_framework() -> None:
    code = (
        "import sys, edgegen.cli, edgegen.node.app, edgegen.executors.onnx, edgegen.executors.tflite,"
        " edgegen.gateway.app;"
        "print(sorted(m for m in ('torch', 'sklearn', 'onnx', 'tensorflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
