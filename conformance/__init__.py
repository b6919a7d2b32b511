"""The conformance gate: transformers' and diffusers' own test mixins on rar_hf (see README.md, `make conformance`)."""
