"""`python -m rar_hf ...` is `rar-hf ...`; `accelerate launch -m rar_hf sample ...` runs the sampler on every process."""

from .cli import main

main()
