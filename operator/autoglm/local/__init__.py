"""The local runtime: ``autoglm up`` runs the whole system on one machine, no cluster."""
