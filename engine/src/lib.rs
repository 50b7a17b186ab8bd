//! blockmesh engine
