"""ONNX graph passes that apply a QuantPlan to the float export.

Each pass is a small onnx-ir `InPlacePass` whose `call()` reports whether it
modified the model. Passes find MatMuls by the module names the export gave them
(the plan's keys), never by guessing shapes. Nothing here imports torch.
"""
