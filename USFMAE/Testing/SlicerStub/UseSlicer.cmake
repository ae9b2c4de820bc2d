# stub: nothing to set up
