"""The web console under /ui/: static shell and assets, served with a strict Content-Security-Policy."""
