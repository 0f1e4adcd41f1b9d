#pragma once
// Generation rounds in fresh processes. Between two invocations of the same command a CPU's
// timings shift together (measured here, README's main command: one invocation's TTFTs 3-12 %
// below another's for every method, most outside both min-max spreads): where a process's memory
// lands, and the machine's drift over minutes. Repeats inside one process cannot show that, so
// by default on the CPU each repeat (one round over every run) is kvbench itself, started again
// with the same command line plus --generation-round-fd and --generation-round-prompt (the ids
// to feed, so no input is read twice): it times one round and writes, per run, one JSON line to
// that descriptor.
#include "cli.hpp"

#include <kvcompress/runtime/token_file.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

extern char** environ;

namespace kvbench {

// --- what a round measured, as one line ------------------------------------------------------

inline nlohmann::json round_line(size_t run, const Run& r, const rt::RunMetrics& g, double seconds, int64_t peak) {
  return {{"run", run},
          {"label", r.label},
          {"seconds", seconds},
          {"peak_memory_bytes", peak},
          {"held_before_bytes", r.held_before_bytes},
          {"gen_ttft_s", g.gen_ttft_s},
          {"gen_later_s", g.gen_later_s},
          {"gen_later_steps", g.gen_later_steps},
          {"gen_tokens", g.gen_tokens},
          {"gen_cache_tokens", g.gen_cache_tokens},
          {"gen_batch", g.gen_batch},
          {"gen_step_s", g.gen_step_s},
          {"gen_compress_s", g.gen_compress_s}};
}

/// Adds one line of a round to its run; returns the run's index. A line that does not fit the
/// runs of this command (another binary, a changed file) is an error, never a silent mix.
inline size_t add_round_line(const std::string& text, std::vector<Run>& runs) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
    const size_t r = j.at("run").get<size_t>();
    if (r >= runs.size() || runs[r].recompute || j.at("label").get<std::string>() != runs[r].label)
      fail("a generation round's process reported run " + std::to_string(r) + " (" +
           kvc::params::printable(j.at("label").get<std::string>()) + "), which this command does not time");
    Run& run = runs[r];
    rt::RunMetrics g;
    g.gen_ttft_s = j.at("gen_ttft_s").get<double>();
    g.gen_later_s = j.at("gen_later_s").get<double>();
    g.gen_later_steps = j.at("gen_later_steps").get<int64_t>();
    g.gen_tokens = j.at("gen_tokens").get<int64_t>();
    g.gen_cache_tokens = j.at("gen_cache_tokens").get<int64_t>();
    g.gen_batch = j.at("gen_batch").get<int64_t>();
    g.gen_step_s = j.at("gen_step_s").get<std::vector<double>>();
    g.gen_compress_s = j.at("gen_compress_s").get<double>();
    run.generations.push_back(std::move(g));
    run.generation_seconds += j.at("seconds").get<double>();
    run.generation_peak_bytes = std::max(run.generation_peak_bytes, j.at("peak_memory_bytes").get<int64_t>());
    run.held_before_bytes = std::max(run.held_before_bytes, j.at("held_before_bytes").get<int64_t>());
    return r;
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("a generation round's process wrote a line this kvbench cannot read (") + e.what() + ")");
  }
}

// --- the parent's side: one child per round ---------------------------------------------------

/// The ids every round's process feeds, in a temporary token file (removed with this object).
class PromptFile {
 public:
  PromptFile(const std::vector<int64_t>& ids, int64_t vocab_size) {
    std::string name = (std::filesystem::temp_directory_path() / "kvbench-prompt-XXXXXX").string();
    const int fd = mkstemp(name.data());
    if (fd < 0) fail("generation rounds: cannot create a temporary file in " +
                     std::filesystem::temp_directory_path().string() + ": " + std::strerror(errno));
    path_ = name;
    std::ostringstream text;
    rt::write_token_file(text, ids, vocab_size, "kvbench-prompt");
    const std::string s = text.str();
    const bool ok = write(fd, s.data(), s.size()) == static_cast<ssize_t>(s.size());
    close(fd);
    if (!ok) {
      std::remove(path_.c_str());
      fail("generation rounds: cannot write the temporary file " + path_);
    }
  }
  ~PromptFile() { std::remove(path_.c_str()); }
  PromptFile(const PromptFile&) = delete;
  PromptFile& operator=(const PromptFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// kvbench run again with `argv` plus --generation-round-fd; its standard output goes to
/// /dev/null, its standard error stays ours (its progress is off, its errors show).
class RoundProcess {
 public:
  static constexpr int kChildFd = 3;

  RoundProcess(int argc, char** argv, const std::string& prompt_file) {
    // A SIGCHLD ignored by whoever started us would make the child reap itself: waitpid could
    // not tell how it ended.
    signal(SIGCHLD, SIG_DFL);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) fail(std::string("generation round: cannot create a pipe: ") + std::strerror(errno));
    // The write end must not already be the child's descriptor: dup2 onto itself would keep
    // its close-on-exec flag.
    const int write_end = fcntl(fds[1], F_DUPFD_CLOEXEC, 10);
    close(fds[1]);
    if (write_end < 0) {
      close(fds[0]);
      fail(std::string("generation round: cannot duplicate a pipe: ") + std::strerror(errno));
    }
    std::vector<std::string> args(argv, argv + argc);
    args.push_back("--generation-round-fd");
    args.push_back(std::to_string(kChildFd));
    args.push_back("--generation-round-prompt");
    args.push_back(prompt_file);
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, write_end, kChildFd);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    const int err = posix_spawn(&pid_, "/proc/self/exe", &actions, nullptr, cargs.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(write_end);
    if (err != 0) {
      close(fds[0]);
      fail(std::string("generation round: cannot start kvbench again through /proc/self/exe (") + std::strerror(err) +
           "); --no-process-per-repeat times every repeat in this process");
    }
    lines_ = fdopen(fds[0], "r");
    if (!lines_) {
      close(fds[0]);
      finish_quietly();
      fail(std::string("generation round: cannot read its pipe: ") + std::strerror(errno));
    }
  }
  ~RoundProcess() {
    close_lines();
    finish_quietly();
  }
  RoundProcess(const RoundProcess&) = delete;
  RoundProcess& operator=(const RoundProcess&) = delete;

  /// The next whole line the child wrote; false at its end. A last line without its newline (a
  /// child stopped mid-write) is not returned: finish() names how the child ended.
  bool next_line(std::string& line) {
    line.clear();
    while (lines_) {
      const int c = std::fgetc(lines_);
      if (c == '\n') return true;
      if (c != EOF) {
        line.push_back(static_cast<char>(c));
        continue;
      }
      if (std::ferror(lines_) && errno == EINTR) {
        std::clearerr(lines_);
        continue;
      }
      cut_short_ = !line.empty();
      close_lines();
    }
    return false;
  }

  /// Waits for the child; an error naming how it ended unless it exited with 0 after whole lines.
  void finish(const std::string& what) {
    close_lines();  // a child still writing gets EPIPE instead of waiting on a full pipe
    const int status = wait_child();
    if (status < 0) fail(what + ": lost its process (" + std::strerror(errno) + ")");
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      if (cut_short_) fail(what + ": its process exited in the middle of a line");
      return;
    }
    const std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                            : WIFSIGNALED(status) ? "was killed by signal " + std::to_string(WTERMSIG(status))
                                                  : "ended abnormally";
    fail(what + ": its process (kvbench run again with the same options) " + how +
         "; its own message, if any, is above; --no-process-per-repeat times every repeat in this process");
  }

 private:
  void close_lines() {
    if (lines_) std::fclose(lines_);
    lines_ = nullptr;
  }
  int wait_child() {
    if (pid_ <= 0) return 0;
    int status = 0;
    pid_t got;
    do got = waitpid(pid_, &status, 0);
    while (got < 0 && errno == EINTR);
    pid_ = 0;
    return got < 0 ? -1 : status;
  }
  // On an error the child is not left running: it is stopped and reaped.
  void finish_quietly() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    wait_child();
  }
  pid_t pid_ = 0;
  std::FILE* lines_ = nullptr;
  bool cut_short_ = false;
};

/// In a round's process: stop when the kvbench that started it ends (killed, or gone before
/// reading), instead of timing on unseen.
inline void stop_with_parent() {
#if defined(__linux__)
  prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
}

/// The child's side: its lines, flushed one by one so the parent's progress follows.
class RoundWriter {
 public:
  explicit RoundWriter(int fd) : out_(fd > 0 ? fdopen(fd, "w") : nullptr) {
    if (fd > 0 && !out_) fail("--generation-round-fd " + std::to_string(fd) + " is not open for writing");
  }
  ~RoundWriter() {
    if (out_) std::fclose(out_);
  }
  RoundWriter(const RoundWriter&) = delete;
  RoundWriter& operator=(const RoundWriter&) = delete;
  bool enabled() const { return out_ != nullptr; }
  void write(const nlohmann::json& line) {
    const std::string text = line.dump() + "\n";
    if (std::fwrite(text.data(), 1, text.size(), out_) != text.size() || std::fflush(out_) != 0)
      fail("--generation-round-fd: cannot write the round's results");
  }

 private:
  std::FILE* out_;
};

}  // namespace kvbench
