"""Guest memory drawn as a grid, one cell per page (`kvmlite pagemap`).

A picture answers at a glance what the page counts only summarise: where the
guest's live pages are, which pages the host never backed, what a running
migration still has to send, and after one, which round sent each page.

One idea a module; nothing here imports another's package `__init__`:

* model.py: the kinds of page a picture shows, and a PageMap (one state per
  page, and the round that sent it) built from a running VM's monitor
  (`x-query-pagemap`: never touched, free, active, dirty; the round that sent
  each page once a migration has run);
* stream.py: a PageMap of a migration stream saved to a file (`kvmlite
  migrate ... file:PATH`), read with the wire format's own decoder: which
  round's records carried each page and which pages came as ZERO records;
* grid.py: a PageMap laid out in cells.  A large guest gets several pages per
  cell; the header says how many, and the legend states the rule a cell
  follows;
* terminal.py: a grid on the terminal (rich; two cells per character with the
  upper half block, or one letter per cell when the output has no colour);
* png.py: a grid as a PNG, written here with zlib and struct only, carrying
  its layout as text so that read_png_cells finds each cell again.

The command itself is kvmlite/tools/pagemap.py.
"""
