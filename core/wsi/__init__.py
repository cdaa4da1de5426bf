"""The slide: lazy OpenSlide handle, µm/px chain, fingerprint, tissue, tiling, nuclei. Imports no store."""
