"""Publishing to the Hugging Face Hub: the eval gate, the model card and the upload.

Each module imports ``huggingface_hub`` only inside its functions, so the CLI's ``--help``
stays light.
"""
