"""repablate.models -- networks whose 3x3 convs are swappable blocks from repablate.nn."""
