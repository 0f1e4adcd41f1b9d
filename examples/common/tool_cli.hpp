#pragma once
// The command lines of the tools (kvbench, kvgen, kvtok): CLI11 (Debian's libcli11-dev) for the
// parsing, the grouped --help and --version; values are taken as text and converted here, so
// that every bad value gets one message naming the flag, its range and what was given, and an
// unknown option or one given twice is reported as such. Plus what more than one tool needs:
// reading a whole file, and the tools' --skip-layers put into a spec that does not set its own.
#include <kvcompress/params.hpp>
#include <kvcompress/registry.hpp>

#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace kvtools {

namespace kvc = kvcompress;

[[noreturn]] inline void fail(const std::string& msg) { throw kvc::Error(msg); }

inline int64_t parse_count(const std::string& flag, const std::string& v, int64_t min) {
  int64_t x = 0;
  if (!kvc::params::parse_int(v, x) || x < min)
    fail(flag + " expects an integer >= " + std::to_string(min) + ", got '" + kvc::params::printable(v) + "'");
  return x;
}

/// `flag`'s value must be one of `options`: "--dtype must be float32, float16 or bfloat16, got 'x'".
inline std::string parse_choice(const std::string& flag, const std::string& v, const std::vector<std::string>& options) {
  std::string listed;
  for (size_t i = 0; i < options.size(); ++i) {
    if (v == options[i]) return v;
    listed += (i == 0 ? "" : i + 1 == options.size() ? " or " : ", ") + options[i];
  }
  fail(flag + " must be " + listed + ", got '" + kvc::params::printable(v) + "'");
}

/// "0,1" -> {0, 1}; "" -> {} (spaces ignored).
inline std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& v) {
  std::vector<int64_t> out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), [](unsigned char c) { return std::isspace(c); }), item.end());
    if (!item.empty()) out.push_back(parse_count(flag, item, 0));
  }
  return out;
}

/// A whole file, bytes as they are; `what` names it in the error ("text file not found ...").
inline std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(what + " file not found or unreadable: " + kvc::params::printable(path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("cannot read " + what + " file " + kvc::params::printable(path));
  return ss.str();
}

// An output file: checked before the run (so a typo does not cost the run), then written whole
// to a temporary file beside it and renamed over it, every write checked: a failed write is an
// error and leaves no partial file.
inline void check_output_path(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(path);
  if (path.empty()) fail(flag + " needs a file name");
  if (fs::exists(p, ec) && !fs::is_regular_file(p, ec))
    fail(flag + " " + path + " exists and is not a regular file");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec)) fail(flag + " " + path + ": no such directory " + dir.string());
  if (access(dir.c_str(), W_OK) != 0) fail(flag + " " + path + ": directory " + dir.string() + " is not writable");
}

inline void write_atomically(const std::string& flag, const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp" + std::to_string(getpid());
  auto failed = [&](const std::string& why) {
    std::remove(tmp.c_str());
    fail("cannot write " + flag + " file " + path + ": " + why);
  };
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) failed(std::strerror(errno));
  const bool written = std::fwrite(content.data(), 1, content.size(), f) == content.size() && std::fflush(f) == 0 &&
                       fsync(fileno(f)) == 0;
  const int error = errno;
  if (std::fclose(f) != 0 || !written) failed(std::strerror(written ? errno : error));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) failed(std::strerror(errno));
}

/// `spec` with skip_layers = `layers` unless it sets them itself: a tool's --skip-layers
/// applies to every method whose spec does not say (as the course project's benchmark did).
inline kvc::ParsedSpec with_skip_layers(kvc::ParsedSpec spec, const std::vector<int64_t>& layers) {
  if (spec.args.count("skip_layers")) return spec;
  kvc::params::SpecValue v;
  v.is_list = true;
  for (int64_t l : layers) v.items.push_back(std::to_string(l));
  spec.args["skip_layers"] = v;
  return spec;
}

/// A tool's command line: options in groups, each value converted by our functions.
class Cli {
 public:
  Cli(std::string name, const std::string& description, std::string version)
      : app_(description, name), name_(std::move(name)), version_(std::move(version)) {
    app_.set_help_flag("-h,--help", "print this help and exit");
    app_.set_version_flag("--version", version_, "print the version and exit");
    app_.allow_extras();  // reported by parse() as unknown options
    app_.get_formatter()->column_width(30);
  }

  /// An option with a value, converted by `convert` (which throws our message).
  CLI::Option* option(const char* flag, const char* type, const char* group, const std::string& help,
                      std::function<void(const std::string&)> convert) {
    return app_.add_option_function<std::string>(flag, std::move(convert), help)->type_name(type)->group(group);
  }
  /// An option that may be given again; `add` takes each value, in order.
  CLI::Option* repeatable(const char* flag, const char* type, const char* group, const std::string& help,
                          std::function<void(const std::string&)> add) {
    return app_
        .add_option_function<std::vector<std::string>>(
            flag, [add](const std::vector<std::string>& values) { for (const auto& v : values) add(v); }, help)
        ->type_name(type)
        ->group(group)
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  }
  CLI::Option* text(const char* flag, std::string& dst, const char* type, const char* group, const std::string& help) {
    return option(flag, type, group, help, [&dst](const std::string& v) { dst = v; });
  }
  CLI::Option* count(const char* flag, int64_t& dst, int64_t min, const char* group, const std::string& help) {
    return option(flag, "N", group, help, [&dst, flag, min](const std::string& v) { dst = parse_count(flag, v, min); });
  }
  CLI::Option* choice(const char* flag, std::string& dst, std::vector<std::string> values, const char* group,
                      const std::string& help) {
    std::string type;
    for (const auto& v : values) type += (type.empty() ? "" : "|") + v;
    return option(flag, "", group, help,
                  [&dst, flag, values](const std::string& v) { dst = parse_choice(flag, v, values); })
        ->type_name(type);
  }
  CLI::Option* flag(const char* name, const char* group, const std::string& help, std::function<void()> set) {
    return app_.add_flag_callback(name, std::move(set), help)->group(group);
  }
  /// `on` sets dst to 1, `off` to 0 (dst stays -1, "the default", with neither); both is an error.
  void on_off(const char* on, const std::string& on_help, const char* off, const std::string& off_help,
              const char* group, int& dst) {
    const std::string both = std::string("give either ") + on + " or " + off + ", not both";
    flag(on, group, on_help, [&dst, both] {
      if (dst == 0) fail(both);
      dst = 1;
    });
    flag(off, group, off_help, [&dst, both] {
      if (dst == 1) fail(both);
      dst = 0;
    });
  }

  /// Parses; --help and --version print and exit 0; a bad command line throws kvcompress::Error.
  void parse(int argc, char** argv) {
    try {
      app_.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
      std::cout << app_.help();
      std::exit(0);
    } catch (const CLI::CallForVersion&) {
      std::cout << version_ << '\n';
      std::exit(0);
    } catch (const CLI::ParseError& e) {
      const std::string what = e.what();
      const std::string twice = ": At Most 1 required but received ";  // CLI11's words for "given twice"
      const auto at = what.find(twice);
      if (at != std::string::npos)
        fail(what.substr(0, at) + " is given " + what.substr(at + twice.size()) + " times, give it once");
      fail(what + " (see " + name_ + " --help)");
    }
    if (!app_.remaining().empty())
      fail("unknown option '" + kvc::params::printable(app_.remaining().front()) + "' (see " + name_ + " --help)");
  }

 private:
  CLI::App app_;
  std::string name_, version_;
};

}  // namespace kvtools
