"""Training data: discovery (`layout`, torch-free), aspect-ratio buckets (`buckets`, torch-free),
caption processing (`captions`, pure) and the image pipeline (`dataset`, PIL/numpy/torch)."""
