"""The datasets' files and the training stream: the CIFAR archives read and checked (cifar_files.py), their
verified `.npy` cache (cache.py), downloads (download.py, which knows no dataset), the shift test sets
CIFAR-10.1 and CIFAR-10-C (shift_sets.py), a writer of CIFAR-format data for tests and the demo
(writer.py), and the stream of augmented batches with the train/validation split (stream.py).

`src.data` is the front door (datasets by name). May import: src.training's layer and below (src.files,
src.errors). Imported by: src.data, configs, and the layers above.
"""
