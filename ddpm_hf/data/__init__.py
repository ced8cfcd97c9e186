"""Datasets: every image source (Hub ids, local folders, MedMNIST, the shipped digits) decoded to uint8 tensors."""
