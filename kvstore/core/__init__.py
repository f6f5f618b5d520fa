"""The vocabulary every layer speaks: block identity (``keys``), the block format and its codecs
(``block_format``), the error tree (``errors``) and the data folder lock. Imports nothing else of
kvstore, so every other package may import it."""
