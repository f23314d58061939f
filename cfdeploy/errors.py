"""The one exception type users see: a one-line message naming the file and the problem."""

EXTRAS = {"torch": "export", "open_clip": "export", "onnx": "export", "matplotlib": "bench", "cuda": "cuda", "dlib": "photos", "ray": "serve"}


class CfdeployError(Exception):
    """Bad input or environment; the CLI prints ``error: <message>`` and exits with code 2."""


def missing_extra(package: str, needed_for: str, cause: BaseException | None = None) -> CfdeployError:
    """The error for a package a command needs but the install lacks, naming what to install."""
    if package == "tensorrt":
        return CfdeployError(
            f"{needed_for} needs TensorRT, which is not installed here ({cause}); on Jetson it comes with JetPack, "
            "elsewhere `pip install tensorrt`"
        )
    extra = EXTRAS.get(package, "export")
    return CfdeployError(f"{needed_for} needs {package}, which this install lacks: pip install \"cfdeploy[{extra}]\"")
