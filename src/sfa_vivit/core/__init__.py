"""Infrastructure under everything else: the device and ranks (`runtime`), files on any fsspec URL
(`storage`), one writer per output folder (`lease`), progress lines (`progress`) and plots (`plots`)."""
