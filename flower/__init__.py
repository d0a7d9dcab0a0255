"""fwdllm on Flower: the coordinator core as a ServerApp, device work as a ClientApp (README.md here)."""
