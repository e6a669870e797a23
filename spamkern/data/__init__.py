"""Data sets of the SpaM experiments as train/test tensors, read offline.

scikit-learn's breast cancer and digits tables (digits also upsampled to 28x28) ship with
scikit-learn; MNIST, FashionMNIST and CIFAR-10 are read from a local folder in torchvision's
on-disk layout.
"""

from spamkern.data.datasets import DATASETS, DatasetSplit, dataset_names, load_dataset

__all__ = ["DATASETS", "DatasetSplit", "dataset_names", "load_dataset"]
