"""What a training step needs beside the model: optimizers and learning-rate schedules by name (optim.py),
the step's recipe (recipe.py: mixup, cutout, label smoothing, clipping, the step itself), the device and
precision (hardware.py), and the ranks under torchrun (distributed.py).

May import: src.config, src.files, src.errors, src.signals. Imported by: src.networks, src.data, configs,
src.evaluation, src.extensions, src.main_loop and above.
"""
