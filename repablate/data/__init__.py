"""repablate.data -- LightningDataModules; every default works offline."""
