# utf8proc (Debian: libutf8proc-dev) as the imported target kvcompress::utf8proc: it ships no
# CMake package of its own. Used by the build and by the installed kvcompressConfig.cmake.
if(NOT TARGET kvcompress::utf8proc)
  find_path(KVCOMPRESS_UTF8PROC_INCLUDE_DIR utf8proc.h)
  find_library(KVCOMPRESS_UTF8PROC_LIBRARY NAMES utf8proc)
  if(KVCOMPRESS_UTF8PROC_INCLUDE_DIR AND KVCOMPRESS_UTF8PROC_LIBRARY)
    add_library(kvcompress::utf8proc UNKNOWN IMPORTED)
    set_target_properties(kvcompress::utf8proc PROPERTIES
      IMPORTED_LOCATION "${KVCOMPRESS_UTF8PROC_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${KVCOMPRESS_UTF8PROC_INCLUDE_DIR}")
  endif()
endif()
