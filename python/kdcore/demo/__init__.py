"""``kdcore demo``: distil a small tool-using agent end to end (see :mod:`.pipeline`)."""
