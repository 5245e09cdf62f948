"""packq.interop: the torch side of packq (DLPack hand-off, the ExLlama path)."""
