"""The training image pipeline (`dataset`: PIL/numpy/torch): images, crops and flips, captions per
epoch, batches by bucket. What a dataset holds is planned by the torch-free `trainer.core.dataset`."""
