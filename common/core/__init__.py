"""The model and the LTE algorithm: LTE layers, the merge, a model's state by name, the state
policy and conversion, quantisation, calling a model, Hugging Face models. Imports no other
``lte.common`` sub-package."""
