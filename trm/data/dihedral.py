"""The 8 symmetries of the square (the dihedral group D4) as maps of a [h, w] grid: the augmentations
TRM (arXiv 2510.04871 §5, after HRM) applies to ARC and Maze-Hard. Each one maps the grid's
4-neighbour graph onto itself, so anything defined by adjacency (a path, a distance) survives it."""

import numpy as np

DIHEDRAL = (
    lambda g: g,                  # 0 identity
    lambda g: np.rot90(g, 1),     # 1 rotate 90 degrees anticlockwise
    lambda g: np.rot90(g, 2),     # 2 rotate 180
    lambda g: np.rot90(g, 3),     # 3 rotate 270
    np.fliplr,                    # 4 mirror left-right
    np.flipud,                    # 5 mirror up-down
    lambda g: g.T,                # 6 transpose (main diagonal)
    lambda g: np.rot90(g, 2).T,   # 7 anti-transpose (other diagonal)
)
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)  # DIHEDRAL[DIHEDRAL_INVERSE[k]] undoes DIHEDRAL[k]
SHAPE_KEEPING = (0, 2, 4, 5)  # the ones that map an h x w grid to h x w when h != w (no quarter turn, no transpose)
