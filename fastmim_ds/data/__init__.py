"""Dataset conversion (ImageFolder -> .beton) and FFCV loaders."""
