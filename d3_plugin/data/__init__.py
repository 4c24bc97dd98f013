"""Datasets as uint8 tensors, batched augmentation, and readers for datasets on disk."""
from .images import DatasetSpec, ImageSet, Loader, augment
from .readers import DatasetNotFound, dataset_spec, load_dataset, load_mnist_like, load_cifar, SPECS

__all__ = ["DatasetSpec", "ImageSet", "Loader", "augment", "DatasetNotFound", "dataset_spec",
           "load_dataset", "load_mnist_like", "load_cifar", "SPECS"]
