"""TensorRT engines built from a bundle's ONNX graphs: the plan (pure logic), the builder and the runtime."""
