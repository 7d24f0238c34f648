"""The shared ground every stage stands on: errors, failpoints, atomic writes, the machine cache, the process
group (`world`), model-family facts (`architectures`), masks, text data, precision and ZeRO-3 loading facts.
Imports nothing else of sparsegpt."""
