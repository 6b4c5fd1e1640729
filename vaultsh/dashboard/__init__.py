"""The Textual dashboard (`vaultsh collect`, `vaultsh watch`): a view over vaultsh.supervise."""
