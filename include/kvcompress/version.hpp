#pragma once

#define KVCOMPRESS_VERSION_MAJOR 0
#define KVCOMPRESS_VERSION_MINOR 1
#define KVCOMPRESS_VERSION_PATCH 0

namespace kvcompress {
inline constexpr const char* version_string = "0.1.0";
}  // namespace kvcompress
