"""The array-API core: pure functions of ``xp`` and arrays, run by every backend."""
