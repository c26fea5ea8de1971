"""``smoe-tune``'s parts: the candidates it enumerates, the memory model that prunes them, the short
runs that time the survivors, the search that orders those runs, and the report it writes."""
